import sys

from switcher.cli import main

sys.exit(main())
