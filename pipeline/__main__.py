from pipeline.allocator import reexec_with_tuned_allocator

# Before torch is imported: the process may be replaced by itself with glibc's tunables set.
reexec_with_tuned_allocator()

from pipeline.cli import main  # noqa: E402

raise SystemExit(main())
