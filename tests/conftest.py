import sys
from pathlib import Path

# tests/runs.py holds the one helper that starts real `nitp` processes
sys.path.insert(0, str(Path(__file__).resolve().parent))
