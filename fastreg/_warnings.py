"""Warnings that point at the user's line, not at fastreg's (or torch's) internals."""

import os
import sys
import warnings

import torch

_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                       for m in (sys.modules[__package__], torch))


def warn(message, category=RuntimeWarning):
    """``warnings.warn`` with the stack level of the first frame outside fastreg and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
