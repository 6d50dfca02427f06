from avepipe.cli import main

raise SystemExit(main())
