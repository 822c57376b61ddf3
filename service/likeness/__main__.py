from likeness.cli.main import main

raise SystemExit(main())
