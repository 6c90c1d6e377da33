"""``python -m tinyrecon bench|info|compare``: the same as the ``tinyrecon`` command."""
from .cli import main

raise SystemExit(main())
