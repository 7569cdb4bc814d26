"""`python -m llmtrain.report <dir>`: the summary of every run under a directory (llmtrain.sweeps.report)."""
import sys

from llmtrain.sweeps.report import main

if __name__ == "__main__":
    sys.exit(main())
