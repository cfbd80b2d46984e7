"""c3dseg: 3D cell instance segmentation with flow fields (a 3D extension of Cellpose).

Arrays are ZYX; spacing is a (z, y, x) tuple in micrometres.  See ``README.md``.
"""

__version__ = "0.1.0"
