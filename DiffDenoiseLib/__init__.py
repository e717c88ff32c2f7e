"""DiffDenoise core library: self-supervised denoising of CT, MRI and X-ray images.

No Qt and no Slicer import at module level, so the library runs in Slicer, in a
background worker process and in plain Python alike.
"""

__version__ = "0.1.0"
