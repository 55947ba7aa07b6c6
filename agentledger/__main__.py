import sys

from agentledger.cli import main

sys.exit(main())
