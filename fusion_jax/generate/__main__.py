import sys

from fusion_jax.generate.cli import main

sys.exit(main())
