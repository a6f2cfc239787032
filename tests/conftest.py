import sys
from pathlib import Path

# Test helper modules (e.g. blip_layout) import by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
