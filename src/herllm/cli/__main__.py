"""`python -m herllm.cli ...` (what torchrun and accelerate launch run)."""

import sys

from herllm.cli import main

sys.exit(main())
