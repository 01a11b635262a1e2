from oip.main import main

main()
