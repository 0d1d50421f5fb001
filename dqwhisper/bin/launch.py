"""torchrun, with a training error as the last line instead of torchrun's traceback.

`python -m dqwhisper.bin.launch [torchrun options] -m dqwhisper.bin.train ...` (scripts/train_ce_ctc.sh). The workers
print their own one-line error (`train: ...`); torchrun's ChildFailedError report after it (some 30 lines) is left
out, and the worker's exit code is passed on (a worker killed by a signal gets one line saying so).
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code > 0:  # the worker said why (`train: ...`, or a Python traceback for a bug)
            return code
        print(f"train: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
