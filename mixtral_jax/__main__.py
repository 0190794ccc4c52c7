import sys

from mixtral_jax.cli import main

sys.exit(main())
