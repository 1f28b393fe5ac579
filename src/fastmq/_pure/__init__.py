"""The pure-Python backend of fastmq (``FASTMQ_BACKEND=pure``).

Same behaviour as the C core, implemented with files under /dev/shm, ``pread``/
``pwrite`` and POSIX record locks. See ``ring.py`` for the design.
"""
