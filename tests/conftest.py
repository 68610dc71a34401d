"""Suite-wide settings.

The `reslab` command tunes glibc's allocator for the whole process (`reslab.runtime`); tests call
it in-process, and a tuned process can no longer measure `reslab bench --allocator system`. So the
suite keeps glibc's defaults, and tests/test_runtime.py checks the tuning in fresh processes."""

import os

os.environ["RESLAB_ALLOCATOR"] = "system"
