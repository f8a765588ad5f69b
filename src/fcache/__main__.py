from fcache.cli import main

main()
