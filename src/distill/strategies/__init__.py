"""Training strategies built from the library's pieces (Distiller, methods, loaders, ``fit``).

Each strategy lives in its own module and is imported by name, e.g.
``from distill.strategies.condense import fit_condensed``; nothing is imported here.
"""
