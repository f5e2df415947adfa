from icl_jax.cli import main

raise SystemExit(main())
