"""`python -m tunesmith` runs the CLI; so do `torchrun --nproc_per_node N -m tunesmith train ...` and
`accelerate launch --multi_gpu --num_processes N -m tunesmith train ...` for data-parallel training."""

import sys

from .cli import main

sys.exit(main())
