"""``python -m trionet`` runs the service's command line."""

import sys

from trionet.service.cli import main

sys.exit(main())
