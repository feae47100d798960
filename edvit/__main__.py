from edvit.cli import main

raise SystemExit(main())
