from bitrain.cli import main

raise SystemExit(main())
