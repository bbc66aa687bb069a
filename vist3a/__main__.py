import sys

from vist3a.cli import main

sys.exit(main())
