from clinicalblip.cli import main

raise SystemExit(main())
