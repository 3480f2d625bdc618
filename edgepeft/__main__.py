"""``python -m edgepeft`` and the ``edgepeft`` command (pyproject's script): the command line, loaded here so that a
Ctrl-C while its modules load (numpy, click: a fifth of a second) ends as one later does, not in a traceback."""
import sys


def run():
    try:
        from edgepeft.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    return main()


if __name__ == "__main__":
    run()
