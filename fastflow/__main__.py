from fastflow.cli import main

raise SystemExit(main())
