from beacon.cli import main

raise SystemExit(main())
