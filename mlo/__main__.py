"""``python -m mlo`` (and ``torchrun -m mlo run ...``): the `mlo` command."""

from .cli import main

raise SystemExit(main())
