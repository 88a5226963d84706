from trimkv.cli import main

raise SystemExit(main())
