"""Where the checkout's folders are: the one place that knows the repository's layout.

Only the command-line stages, bench/ and the tests import this. It is packed into the .mar with
the rest of contract/, but the handler never imports it: inside an unpacked archive there is no
repository, and the handler finds bundle.json and its model beside itself.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
