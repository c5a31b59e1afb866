"""The demo's commands, run from the repository root (demo.sh calls them):

    python -m demo data --out data/demo --per-class 400 --resolution 16   # the embedded demo set (data.py)
    python -m demo nets --out demo/nets                                   # train the encoder and the evaluator
    python -m demo evaluate --ckpt demo_out/demo/checkpoints/0002000.pt --cfg-scale 4   # judge a checkpoint
    python -m demo miniature --out miniature_out                          # REPA in miniature (miniature.py)

`python -m demo COMMAND --help` lists each command's options. Errors print one line, no traceback.
"""

import sys

from demo import data, domain, miniature

COMMANDS = {
    "data": data.main,
    "nets": domain.main,  # domain's own subcommands: nets, evaluate
    "evaluate": domain.main,
    "miniature": miniature.main,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__ + f"\nchoose a command: {', '.join(COMMANDS)}")
    try:
        command = COMMANDS[argv[0]]
        return command(argv) if command is domain.main else command(argv[1:])
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as err:  # one line, no traceback
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
