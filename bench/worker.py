"""One measurement in a process of its own (so that its peak memory and compile caches are its own):

    python -m bench.worker PART PARAMS_JSON OUT_JSON        PART: baseline, bare_step or augment
"""

import json
import sys
from pathlib import Path

import torch

from bench import baseline, steps
from bench.common import peak_memory

PARTS = {"baseline": baseline.measure, "bare_step": steps.bare_step, "augment": steps.augment}


def main(argv: list[str]) -> int:
    part, params, out = argv[0], json.loads(argv[1]), Path(argv[2])
    result = PARTS[part](**params)
    result.update(peak_memory(torch.device(params["device"])), torch_threads=torch.get_num_threads())
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
