import sys

from dmf.cli import main

sys.exit(main())
