import sys

from pyadaq.cli import main

sys.exit(main())
