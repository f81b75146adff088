import sys

from pilelm.core.cli import main

sys.exit(main())
