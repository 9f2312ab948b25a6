from o2f.cli import main

raise SystemExit(main())
