import sys

from xcloudd.cli import main

sys.exit(main())
