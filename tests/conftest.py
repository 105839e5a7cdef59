import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "input.txt"

# Machines here have no internet: tiktoken reads its gpt2 files from ../shared when not told otherwise.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
sys.path.insert(0, str(ROOT))
