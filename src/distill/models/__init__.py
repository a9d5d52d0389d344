"""Models: a timm-style registry and small CNN/MLP families with named tap points.

    from distill.models import create, list_models
    teacher = create("cnn_digits_teacher")
    student = create("cnn", widths=(8, 16), num_classes=10)
    teacher.tap_points  # ("stem", "stage1.pre", "stage1", ..., "pool", "fc")
"""

from distill.models.registry import UnknownModelError, create, create_model, list_models, register_model
from distill.models.small import CNN, MLP  # importing registers the built-in models
from distill.models import cifar  # noqa: F401  (registers the CIFAR zoo)
from distill.models import moonshine  # noqa: F401  (registers the Moonshine cheap-conv WRNs)
from distill.models import sequence  # noqa: F401  (registers the frame and text models)
from distill.models import bilstm  # noqa: F401  (registers Tang et al.'s BiLSTM student)
from distill.models import generators  # noqa: F401  (registers the DAFL/DFAD generators)
from distill.models import convnet  # noqa: F401  (registers convnet3, dataset distillation's ConvNet)
from distill.models import lenet  # noqa: F401  (registers lenet5 / lenet5_half, DAFL/DFAD's MNIST pair)
from distill.models import detection  # noqa: F401  (registers gfl_teacher / gfl_student, the GFL-style detectors)
from distill.models import segmentation  # noqa: F401  (registers seg_teacher / seg_student, DeepLab-lite)
from distill.models import detr  # noqa: F401  (registers detr_teacher / detr_student)
from distill.models import pointcloud  # noqa: F401  (registers pillars_teacher / pillars_student / pointnet_bev_student)
from distill.models import mono3d  # noqa: F401  (registers mono_teacher / mono_student, MonoDistill's pair)
from distill.models import vit  # noqa: F401  (registers vit_tiny / deit_tiny / vit_small, timm-laid-out ViTs)
from distill.models import vit_relpos  # noqa: F401  (registers vit_tiny_rpb, FD's shared relative position bias)
from distill.models import slimmed_vit  # noqa: F401  (registers sit_tiny / sit_small, SiT's token-slimmed ViTs)
from distill.models import mvs  # noqa: F401  (registers mvsnet_teacher / mvsnet_student, KD-MVS's pair)
from distill.models import gnn  # noqa: F401  (registers gcn / gat / sage / mlp_graph; torch-geometric is imported when one is built)
from distill.models import stylegan  # noqa: F401  (registers stylegan_mnist / stylegan_small / stylegan_discriminator)
from distill.models import hetero_gnn  # noqa: F401  (registers hetero_gnn / hetero_gnn_small, HIRE's pair)
from distill.models import img2img  # noqa: F401  (registers unet_img2img(_teacher/_student) / patchgan, pix2pix-style)
from distill.models import binary  # noqa: F401  (registers binary_cnn / cnn_digits_teacher_binary; issue 17 E)

__all__ = ["CNN", "MLP", "UnknownModelError", "create", "create_model", "list_models", "register_model"]
