#!/usr/bin/env python
"""CPU speed benchmark, the same as `hf-extras bench` (see `hf_extras.bench`):

python benchmarks/run_cpu.py            # the full suite (tens of minutes on 2 cores)
python benchmarks/run_cpu.py --quick    # a tiny smoke run (seconds)
"""

import sys

from hf_extras.bench import main

if __name__ == "__main__":
    sys.exit(main())
