from river.cli import main

raise SystemExit(main())
