#include <iostream>

#include "hello/greet.h"

int main(int argc, char** argv) {
  std::cout << Greet(argc > 1 ? argv[1] : "kiln") << std::endl;
  return 0;
}
