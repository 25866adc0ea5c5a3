from lightning_incremental.cli import main

raise SystemExit(main())
