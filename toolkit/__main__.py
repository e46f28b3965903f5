import sys

from toolkit.submit import main

sys.exit(main())
