import sys

from pilelm.cli import main

sys.exit(main())
