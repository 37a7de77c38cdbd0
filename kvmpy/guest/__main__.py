"""``python -m kvmpy.guest [program...]``: build guest programs and print the ELF paths."""

from .build import main

raise SystemExit(main())
