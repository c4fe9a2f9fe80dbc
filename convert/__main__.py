"""`python -m convert SRC DST [--experts packed|bf16|fp32] [--dtype bf16|fp32] [--overwrite]`."""

import sys

from oss_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
