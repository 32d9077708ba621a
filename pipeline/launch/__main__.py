from pipeline.launch.client import main

raise SystemExit(main())
