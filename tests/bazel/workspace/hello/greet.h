#ifndef HELLO_GREET_H_
#define HELLO_GREET_H_

#include <string>

std::string Greet(const std::string& name);

#endif  // HELLO_GREET_H_
