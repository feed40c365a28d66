"""Back-ends of the developer tools in ``tools/`` (which stay thin command-line faces over them):
``parity`` (one gathered forward+backward dumped, and the one comparison of two dumps that tools
and tests share) and ``bench`` (timing one execution mode in a fresh process). The training path
never imports this package."""
