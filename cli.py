"""Run the `ptq` command line from a checkout without installing: `python cli.py quantize ...`."""

from ptq.cli import main

if __name__ == "__main__":
    main()
